"""Labelled text data: the embedded tweet corpus, CSV files and stratified splits."""

from tfcompress.data.csv_files import from_csv
from tfcompress.data.dataset import Splits, TextDataset, split
from tfcompress.data.tweets import TWEET_LABELS, load_tweets, tweets_csv

__all__ = ["Splits", "TWEET_LABELS", "TextDataset", "from_csv", "load_tweets", "split",
           "tweets_csv"]
